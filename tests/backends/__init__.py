"""One contract suite, run against every coordination backend on real servers."""
