"""`loraforge board`: pick a model and data, train with a live loss chart, stop and resume, in a browser."""
