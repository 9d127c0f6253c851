"""Training methods: each builds the plan of stages (and the selections) of a run."""
