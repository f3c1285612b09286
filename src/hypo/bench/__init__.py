"""`hypo bench`: seconds per optimizer step and peak memory of our DPO and HyPO next to TRL's trainers, on the
same work, against the machine's own rates (`runner` orchestrates, one process per `variants` entry; `probes`
measure the machine; `results` computes the ratios and the table)."""
