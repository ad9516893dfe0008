"""Text models (Hugging Face transformer encoders and classifiers) and text data."""
