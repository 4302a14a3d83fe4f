"""Bad input and faults, run through the real CLI: each is one `error:` line and exit 2."""
