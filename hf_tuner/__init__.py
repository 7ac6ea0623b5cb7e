"""hf-tuner: fine-tune pretrained checkpoints on the Hugging Face stack and measure base vs tuned."""

__version__ = "0.1.0"
