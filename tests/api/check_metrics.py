"""Parse a Prometheus text exposition from stdin with the reference parser
(prometheus_client) and print its families as JSON; exit 1 on a parse
error. Used by tests/tests/observe.rs."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

try:
    families = [
        {
            "name": f.name,
            "type": f.type,
            "help": f.documentation,
            "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples],
        }
        for f in text_string_to_metric_families(sys.stdin.read())
    ]
except Exception as e:  # the parser raises ValueError and friends
    print("parse error: %s" % e, file=sys.stderr)
    sys.exit(1)
json.dump(families, sys.stdout)
