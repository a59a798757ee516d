"""Training: the loop (``trainer``), sampling (``rollout``), evaluation, the reference's SFT,
preference pairs, export, and ``api`` (the function ``tokenmdp.train``)."""
