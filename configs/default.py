"""The document's experiment on Fashion-MNIST: its conv net with batch norm, Adam 1e-3, batch 128.

    python -m train --config configs/default.py --workdir runs/default
    python -m train --config configs/default.py --workdir runs/lr \
        --config.optimizer.learning_rate=3e-3

Every other config in this folder starts from this one and changes a few fields.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Read by train/data.load_dataset.
    config.dataset = dataset = ml_collections.ConfigDict()
    dataset.name = "fashion_mnist"  # 'fashion_mnist' | 'mnist' | 'cifar10' | 'synthetic'
    dataset.source = "auto"  # 'auto' | 'local' | 'tfds' | 'synthetic'
    dataset.data_dir = config_dict.placeholder(str)  # local files; None: the standard places
    dataset.tfds_data_dir = config_dict.placeholder(str)
    dataset.tfds_download = False
    dataset.synthetic_train_size = 1024
    dataset.synthetic_test_size = 256
    dataset.synthetic_image_shape = (32, 32, 3)
    dataset.synthetic_num_classes = 10
    dataset.augment = False

    # The network (train/models.py).
    config.model = model = ml_collections.ConfigDict()
    model.features = (64, 64, 32, 16)  # the document's; the last conv has one filter per class
    model.use_batch_norm = True
    # Arguments of every jbn.BatchNorm, under jbn's own (TF1) names and passed to it as they are;
    # jbn checks them (jbn.layer.layer_options) and its errors name them.
    model.batch_norm = batch_norm = ml_collections.ConfigDict()
    batch_norm.decay = 0.9  # the document's choice (TF1 default 0.999)
    batch_norm.epsilon = 1e-3
    batch_norm.center = True  # TF1 batch_norm defaults: beta yes, gamma no (ReLU follows)
    batch_norm.scale = False
    batch_norm.zero_debias_moving_mean = False
    batch_norm.renorm = False
    batch_norm.renorm_decay = 0.99
    # Bounds of batch renorm's r (rmin, rmax; the paper takes rmin = 1 / rmax) and |d| (dmax).
    # A bound left None is not clipped; all None: no renorm_clipping argument.
    batch_norm.renorm_clipping = ml_collections.ConfigDict()
    batch_norm.renorm_clipping.rmax = config_dict.placeholder(float)
    batch_norm.renorm_clipping.rmin = config_dict.placeholder(float)
    batch_norm.renorm_clipping.dmax = config_dict.placeholder(float)
    batch_norm.virtual_batch_size = config_dict.placeholder(int)  # ghost batch size per device
    # The app's own batch norm settings (not jbn.BatchNorm arguments):
    model.batch_norm_l2 = 0.0  # L2 weight on beta/gamma, sown by jbn.BatchNorm, added to loss
    model.sync_batch_stats = True  # with several devices: statistics of the global batch
    model.relu_on_logits = True  # the document's ReLU after the last BN (non-negative logits)
    model.dtype = "float32"
    # 'jbn' or 'flax' (flax.linen.BatchNorm, the comparison network of the benchmarks).
    model.batch_norm_impl = "jbn"
    # Convolutions and max pools with faster derivatives on CPU, same values and gradients
    # (train/layers.py); False: flax's own layers, for comparison.
    model.fast_layers = True

    config.optimizer = optimizer = ml_collections.ConfigDict()
    optimizer.name = "adam"  # 'adam' | 'adamw' | 'sgd'
    optimizer.learning_rate = 1e-3  # the document's Adam learning rate
    optimizer.schedule = "constant"  # 'constant' | 'warmup' | 'cosine'
    optimizer.warmup_epochs = 0.0  # linear warmup from 0 (schedules 'warmup' and 'cosine')
    optimizer.b1 = 0.9
    optimizer.b2 = 0.999
    optimizer.eps = 1e-8
    optimizer.weight_decay = 0.0  # decoupled weight decay, 'adamw' only
    optimizer.momentum = 0.9  # 'sgd' only

    config.batch_size = 128  # global: split evenly over all devices of all processes
    config.eval_batch_size = 1000  # the last test batch is padded and masked
    # Measured on a 2-core Intel Xeon VM (2026-12-01): 2 epochs (936 steps) in 2 minutes, about
    # 1,240 train images/s, 89.9% test accuracy.
    config.num_epochs = 2
    config.num_train_steps = -1  # > 0: stop (and evaluate) after this many steps instead

    # Devices: 1 = one device; -1 = all local devices (of every process); n = the first n.
    config.num_devices = 1
    # With several devices: 'sharding' (one jax.jit over a mesh of all devices, batch sharded)
    # or 'pmap'. Both train to the same numbers; checkpoints move between them.
    config.parallelism = "sharding"
    # >0: ask XLA for this many CPU devices (simulated data parallelism on a CPU-only host).
    config.num_cpu_devices = 0
    # The library XLA runs convolutions in on CPU (train/xla_options.py): 'eigen', the faster
    # at this network's shapes, or 'ynnpack', XLA's default. Same math to float32 round-off.
    config.cpu_convolutions = "eigen"
    # Training steps per call of the compiled program (one lax.scan over a stack of batches):
    # fewer per-call costs, the same numbers. The loop logs, evaluates, saves and stops only
    # between calls, so steps with such events run singly; a signal takes effect at the end of
    # the call it arrives in. 1: one step per call.
    config.steps_per_dispatch = 4

    config.log_every_steps = 50
    # Test-set evaluation (and a checkpoint) at each epoch's end and, when > 0, every this many
    # steps as well (finer curves, e.g. for how fast the moving averages become usable).
    config.eval_every_steps = 0
    config.progress_bar = True
    config.checkpoint_max_to_keep = 2
    # Simulated preemption: save and stop after this global step (None: train to the end).
    config.stop_after_steps = config_dict.placeholder(int)
    return config
