"""`mmdiag bench` and the benchmarks beside it: `suite` runs the table (`mmdiag bench`), one
module per topic gives its rows, `timing` holds what they share; `scale` (`python -m
mmdiag.flows.bench.scale`) and `vlm` (`python -m mmdiag.flows.bench.vlm`) run on their own."""
