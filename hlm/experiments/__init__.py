"""Experiments on top of the decoder: `sweep` and `study` (with `figures`), `calibrate`, `bench`, and what they share
(`quality`: BERTScore; `prompts`: the prompt files)."""
