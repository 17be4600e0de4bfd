"""Batch evaluation: AlpacaEval generation at engine speed, resumable, in alpaca_eval's
``model_outputs`` format, in-process or against a running gateway.

Does not know: SQL, HTTP routes, the online loop.
"""
