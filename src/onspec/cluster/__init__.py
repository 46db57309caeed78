"""Serving and learning on a Ray cluster: `onspec serve --replicas N`.

What runs where (every piece is a Ray actor; nothing here is imported without `--replicas`):
- N engine replicas (`replica.py`), a Ray Serve deployment behind one HTTP endpoint: each holds
  the target, its drafter and the scheduler, and serves the same FastAPI app as `onspec serve`;
- one trainer actor (`trainer.py`): the distiller and its worker, fed by every replica's verify
  records, restarted by Ray from the last checkpoint after a crash;
- the hub (`hub.py`): the published draft versions (each put once into Ray's object store), the
  replicas' reports (version, metrics, acceptance per version), and the global rollback.
`launch.py` starts and stops them; `config.py` holds the flags (importable without Ray).
"""
