"""Double-blind human preference between runs (``ddrl vote``; docs/VOTE.md).

Raters see one prompt and two samples of it from two runs, side by side, with nothing that
says which run made which, and pick the better one or a tie. ``folder`` makes (or continues) a
votes folder: each run's samples for the same prompts and noise under opaque names
(``media``) and the balanced, seeded pair plan (``plan``); ``server`` serves the page and its
JSON API; ``store`` appends the votes and decides who is asked what; ``summary`` and ``stats``
turn the votes into win rates with Wilson intervals, Bradley–Terry scores, inter-rater
agreement and rater flags.
"""
