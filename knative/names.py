"""Every label and annotation name kold puts on a Knative Service or Revision, defined once.

Deploy writes them, ``kold ls``/``describe`` and the pre-warm controller read them, and the
controller's floors are merge-patched onto a Revision under them; a typo in one place would
silently split the two sides, so nothing outside this module spells them out.
"""

from __future__ import annotations

# Labels on the Service and on spec.template.metadata.labels (Knative copies those onto the Revision).
PART_OF = "app.kubernetes.io/part-of"
PART_OF_VALUE = "kold"
FUNCTION = "kold.dev/function"
KOLD_SELECTOR = f"{PART_OF}={PART_OF_VALUE}"

# Labels Knative itself puts on what it creates.
SERVICE_LABEL = "serving.knative.dev/service"

# Service annotations (metadata.annotations): what was published and how the function pre-warms.
SNAPSHOT_URI = "kold.dev/snapshot-uri"  # also on the template: a Revision says which snapshot it serves
SNAPSHOT_ID = "kold.dev/snapshot-id"
SNAPSHOT_BYTES = "kold.dev/snapshot-bytes"
PREWARM = "kold.dev/prewarm"  # the policy text; absent means the default policy

# Template (→ Revision) annotations: Knative's pod autoscaler (KPA) and the progress deadline.
_AS = "autoscaling.knative.dev/"
AUTOSCALING_CLASS = _AS + "class"
AUTOSCALING_METRIC = _AS + "metric"
TARGET = _AS + "target"
MIN_SCALE = _AS + "min-scale"
MAX_SCALE = _AS + "max-scale"
INITIAL_SCALE = _AS + "initial-scale"
SCALE_DOWN_DELAY = _AS + "scale-down-delay"
SCALE_TO_ZERO_RETENTION = _AS + "scale-to-zero-pod-retention-period"
WINDOW = _AS + "window"
PROGRESS_DEADLINE = "serving.knative.dev/progress-deadline"

KPA_CLASS = "kpa.autoscaling.knative.dev"
METRIC_CONCURRENCY = "concurrency"

# Floors the controller merge-patches onto a Revision's metadata.annotations. Under the KPA's own
# prefix on purpose: Knative copies every other Revision annotation into the pod template of the
# Revision's Deployment (pkg/reconciler/revision/resources/meta.go, podAnnotations), so a kold.dev/
# key patched there would roll every pod; autoscaling.knative.dev/ keys are left out of it, and the
# webhook checks only the keys it knows under that prefix.
FLOOR = _AS + "kold-floor"  # JSON {"instances", "until", "reason"}
BASE_MIN_SCALE = _AS + "kold-base-min-scale"  # the Revision's own min-scale before kold raised it
BASE_SCALE_DOWN_DELAY = _AS + "kold-base-scale-down-delay"  # left by an earlier kold: only given back now

# The Knative Serving API kold drives.
GROUP = "serving.knative.dev"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"
SERVICES = "services"
REVISIONS = "revisions"
