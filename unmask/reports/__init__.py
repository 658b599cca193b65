"""Every file a run writes for people: markdown tables (one renderer), plots, the contest
CSV and its sidecars, throughput figures."""
