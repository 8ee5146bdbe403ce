"""Serving a trained model: prediction on new light fields, the demo, the LoRA merge and format conversion."""
