"""Evaluation: answer extraction and scoring (`mgsm`, `humaneval`), the code sandbox (`sandbox`), `loraflow score`.

Scoring never imports the model: it reads a `predictions.jsonl` file, whatever produced it.
"""
