__version__ = "0.1.0"

import sys
# jsonschema 4.26 (imported by Prefect, nbformat and papermill in every fruitflow process) imports `rfc3987_syntax`
# when installed, which builds ~35 Earley parsers at import: about 1 s a process, for the two "iri" formats no schema
# here checks. Marked missing, jsonschema skips those two formats, as without the package (jsonschema issue 1428;
# tests/test_imports.py fails once jsonschema no longer imports it eagerly, and this line can go).
sys.modules.setdefault("rfc3987_syntax", None)
