"""Orchestration: scripts that start clusters, servers and scans for the user (`make demo`,
`make redteam`) and the child-process helpers tests and benchmarks share. Above every other
package: it drives them, nothing imports it."""
