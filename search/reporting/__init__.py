"""Views of a search: the leaderboard, the comparison of runs and the live console.

Reads trial records through the ledger; never trains or writes the trial store.
"""
