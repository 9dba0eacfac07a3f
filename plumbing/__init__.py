"""The run around the algorithm: the command line (cli), the run directory and its checkpoints
(runs), the loop over stages (loop), and tracking and transcripts (tracking)."""
