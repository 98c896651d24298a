"""The work graph: a sweep's trainings and scorings as works (`work`), the one scheduler that runs them
(`schedule`) on a backend (Ray: `ray_backend`, `remote`; a virtual clock: `simulate`), the driver's side
of a run (`run`), and the planner's cost estimates (`costs`, `resources`)."""
