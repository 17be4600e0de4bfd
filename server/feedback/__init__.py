"""Feedback on stored completions: the feedback API's work (taking judgments in, listing
them, a completion with its feedback) and the training-data exports (CUT, KTO, DPO, Quark).

Owns: the translation between HTTP models and the store's rows, and the export formats.
Does not know: SQL (``store``), engines, templates, training.
"""
