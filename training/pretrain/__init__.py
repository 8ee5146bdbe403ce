"""Pretraining the tiny base (its LLaVA and SAM stages, their resumable state) and the random tiny base."""
