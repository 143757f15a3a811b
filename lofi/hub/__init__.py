"""Model download, verification and install state (Hugging Face Hub), per backend."""
