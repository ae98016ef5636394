"""The kernel: what every part of the project may import, and which imports only the standard
library (checked by the import contract in pyproject.toml).

- `errors`: the two error families (HTTP refusals, task failures) and their codes;
- `jobstate`: the job state machine, worker states and lease answers, as enums (pure);
- `ids`: worker ids;
- `runner`: the protocol between a worker and what runs its jobs;
- `media_types`: what kind of media some bytes are;
- `request`: WaveSpeed's field table, the media-field table, tasks, sizes and frame counts, and
  the typed request (`VaceRequest`) parsed once from a job's stored input.
"""
