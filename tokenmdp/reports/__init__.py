"""Reports over runs: ``tokenmdp compare``, ``tokenmdp explain``, plots and tables."""
