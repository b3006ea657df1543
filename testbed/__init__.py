"""Test rigs, not part of what a user deploys: a multi-host federation in network namespaces
(`cluster`, for tests/test_deploy.py and bench/bench_deploy.py) and a process tree's memory
(`proctree`)."""
