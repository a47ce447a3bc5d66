"""Built-in run configurations (JSON files): copy one to start your own."""
