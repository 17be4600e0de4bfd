"""Evaluation: AlpacaEval generation at engine speed, resumable, in alpaca_eval's
``model_outputs`` format, in-process or against a running gateway; and the arena's rating
mathematics (Bradley–Terry leaderboard, the promotion gate's win rate).

Does not know: SQL, HTTP routes, the online loop.
"""
