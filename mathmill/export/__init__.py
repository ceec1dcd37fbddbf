"""Training exports of any pipeline's verified output (``mathmill export``).

``rows`` reads a run directory's verified rows as :class:`~mathmill.export.rows.Example`
(the pipeline detected from its ``manifest.json``), ``formats`` writes them as TRL
``messages`` JSONL, verl RL Parquet, ShareGPT or a ``datasets`` DatasetDict, and ``cli``
is the command. This module imports nothing, so that ``mathmill --help`` stays fast.
"""
