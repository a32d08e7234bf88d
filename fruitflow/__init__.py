__version__ = "0.1.0"

import os, sys
# Prefect makes its home folder the first time it is imported. Unless the user chose one (PREFECT_HOME), a fruitflow
# process's is its work folder's prefect_home/ ($FRUITFLOW_WORKDIR, else the current folder), never ~/.prefect; a run
# in another work folder moves it there (`fruitflow.servers.env_defaults`, `fruitflow.prepare.prepared`).
PREFECT_HOME_CHOSEN = "PREFECT_HOME" in os.environ
if not PREFECT_HOME_CHOSEN:
    try: os.environ["PREFECT_HOME"] = os.path.join(os.path.abspath(os.environ.get("FRUITFLOW_WORKDIR") or "."), "prefect_home")
    except OSError: pass  # no current folder (deleted): Prefect's own default

# jsonschema 4.26 (imported by Prefect, nbformat and papermill in every fruitflow process) imports `rfc3987_syntax`
# when installed, which builds ~35 Earley parsers at import: about 1 s a process, for the two "iri" formats no schema
# here checks. Marked missing, jsonschema skips those two formats, as without the package (jsonschema issue 1428;
# tests/test_imports.py fails once jsonschema no longer imports it eagerly, and this line can go).
sys.modules.setdefault("rfc3987_syntax", None)
