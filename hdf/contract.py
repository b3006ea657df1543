"""Record keys of the client/server message contract (docs/design.md §3), defined once.

`client/` and `server/` both import these names and nothing else from each other. Keys are
kebab-case, as in Flower. MetricRecord values are numbers only: sources travel as indices.
"""

# Records inside a Message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
EVAL_METRICS = "eval-metrics"  # train reply: evaluate's metrics of the received model (SCORE_FIRST)
LAYOUT = "layout"  # ConfigRecord: how the one array of a packed ARRAYS record splits (hdf.packing)

# A packed model (both directions, hdf/packing.py): ARRAYS holds one uint8 Array PACKED, LAYOUT
# the per-array lists below (ConfigRecords hold flat lists: shapes are DIMS split by NDIMS).
PACKED = "packed"
LAYOUT_NAMES = "names"
LAYOUT_DTYPES = "dtypes"  # numpy dtype of each array ("float32", "int64", ...)
LAYOUT_WIRE = "wire"  # how each travels: its dtype, or "bfloat16" / "float16" for float32
LAYOUT_NDIMS = "ndims"
LAYOUT_DIMS = "dims"
LAYOUT_DELTA = "delta"  # 1: float arrays are (trained - received), as 16-bit replies send them

# Server -> client config keys.
SERVER_ROUND = "server-round"
RUN_CONFIG = "run-config"  # the resolved Hydra config as YAML text
LOCAL_EPOCHS = "local-epochs"  # float: 0.5 is half a pass over the site's training split
LR = "lr"
PROXIMAL_MU = "proximal-mu"
SPLIT = "split"  # evaluate: which split of the source to score ("val" or "test")
FIXED_NORM = "fixed-norm"  # train: 1 asks the site to normalise with the received model's
# BatchNorm running statistics and leave them as received (FixBN), 0 or absent: batch statistics
LOCAL_VAL = "local-val"  # train: 1 asks the client to score its trained model on its val split
SCORE_FIRST = "score-first"  # train: 1 asks the client to first score the received model on
# its val split and reply those scores (evaluate's keys) as EVAL_METRICS (one exchange a round)

# Client -> server metric keys.
NUM_EXAMPLES = "num-examples"
SOURCE_INDEX = "source-index"
LOSS_BEFORE = "loss-before"
LOSS_BEFORE_BALANCED = "loss-before-balanced"  # same sample, mean over classes of class-mean CE
TRAIN_LOSS = "train-loss"
TRAIN_UAR = "train-uar"
TRAIN_WAR = "train-war"
LOSS = "loss"
LOSS_BALANCED = "loss-balanced"  # evaluate: class-balanced loss (checks loss-before-balanced)
UAR = "uar"
WAR = "war"
RECALL_PREFIX = "recall-"  # per-class recall: "recall-0" .. "recall-6"
SKIPPED_CLIPS = "skipped-clips"
HELDOUT = "heldout"  # query reply: 1 when the node serves a held-out (evaluate-only) source
NUM_PARTITIONS = "num-partitions"  # query reply: simulated federation size (0 when deployed)

# Strategy extras (server -> client config; client -> server optional metrics).
LOCAL_NORM = "local-norm"  # config, "all" (FedBN) | "stats" (SiloBN) | "recompute": site norm state
LOCAL_NORM_MODES = ("none", "stats", "recompute", "all")  # the values LOCAL_NORM may take
LOCAL_NORM_STATE = "local-norm"  # context.state ArrayRecord: this site's own normalization layers
LOCAL_VAL_LOSS = "local-val-loss"  # optional: the trained local model's validation loss (FedDG-GA)
OPTIMIZER_STATE = "optimizer-state"  # context.state ArrayRecord: this site's optimiser state
OPTIMIZER_META = "optimizer-meta"  # context.state ConfigRecord: the round, run and kind it is from
ADAPTED_PREFIX = "adapted-"  # evaluate reply of a held-out site: scores after test-time adaptation


def adapted_key(method: str, key: str) -> str:
    """Metric key of `key` (e.g. `uar`, `recall-3`) scored after adaptation `method`:
    "adapted-bn-uar". Method names hold no "-" (hdf.adapt.METHODS)."""
    return f"{ADAPTED_PREFIX}{method}-{key}"
