"""Evaluation: draw the paper's prompts, embed, score, report."""
