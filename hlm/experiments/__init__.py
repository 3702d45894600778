"""Experiments on top of the decoder: `sweep` and `study` (with `figures`), `humaneval` (pass@1), `calibrate`, `bench`,
`fleet`, and what they share (`workers`: where jobs run; `quality`: BERTScore; `prompts`: the prompt files)."""
