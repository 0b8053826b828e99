"""pydistill's benchmark suite: the shared harness and one script per loss family."""
