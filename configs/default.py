"""The main job: U-Net on the built-in synthetic scenes (4 classes), trained and evaluated on CPU.

COMMAND:
  python -m segjax.main --config=configs/default.py --workdir=runs/default
  (`make train` runs exactly this.) Override any field: --config.model.depth=4 --config.train.steps=500

Every field of every config lives here once, with its default; other config files start from
`get_config()` and change fields. A field that is not here is an error (typos never pass silently).
"""

import os

import ml_collections
from ml_collections import config_dict


def no_argument(arg: str | None, file: str) -> None:
    """`--config=FILE:ARG` for a config file without variants is an error, not ignored."""
    if arg:
        raise ValueError(f"configs/{os.path.basename(file)} takes no argument, got {arg!r}")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    no_argument(arg, __file__)
    c = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic_shapes"  # 'synthetic_shapes' | 'synthetic_volumes' | 'folder' | 'nifti' | 'tfds:NAME'
    c.data.tfds_dir = ""  # where prepared TFDS datasets live; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.num_classes = 4  # labels must lie in 0..num_classes-1 (or equal ignore_label)
    c.data.class_names = ("background", "tool", "berry", "leaf")  # one per class, used in metric names
    c.data.ignore_label = -1  # label value excluded from loss and metrics; -1 = none
    c.data.channels = 3  # image channels the model expects; a mismatch is an error
    c.data.cache = True  # decode the whole split once into memory (small datasets)
    c.data.cache_memory_fraction = 0.5  # cache=True: refused (before decoding) when the splits would fill more
    #   than this share of the host's available memory; a large folder streams with data.cache=False
    c.data.num_threads = 2  # grain reader threads
    c.data.prefetch = 4  # batches prepared ahead of the training step
    c.data.dir = ""  # data.name='folder': a folder with images/ and masks/ (see segjax/data/folder.py)
    c.data.folder = ml_collections.ConfigDict()
    c.data.folder.classes_file = ""  # names in id order (JSON list / id->name object, or a line each), in data.dir;
    # set: it defines data.num_classes and data.class_names (segjax/data/class_file.py); '' = the config's
    c.data.folder.split_file = ""  # CSV (relative to data.dir) with `id` and a split column; '' = not used
    c.data.folder.split_column = "split"  # that column's name; values train / val
    c.data.folder.num_folds = 0  # k-fold validation: 0 = off, else fold `fold` of `num_folds` is validation
    c.data.folder.fold = 0
    c.data.folder.val_fraction = 0.2  # otherwise: this fraction of the images, chosen with split_seed
    c.data.folder.split_seed = 0
    c.data.folder.rescale = "none"  # images deeper than 8 bits (16-bit microscopy): 'none' (an error) |
    #   'percentile' | 'minmax': scaled to 0..255 per image and channel when prepared (segjax/data/intensity.py)
    c.data.folder.percentiles = (0.5, 99.5)  # 'percentile': clip range, in percent
    c.data.folder.exif = "error"  # files with an EXIF orientation (phone photos): 'error' | 'apply' (turned as
    #   viewers and annotation tools show them) | 'ignore' (the stored pixels); see segjax/data/png.py
    c.data.folder.mask_threshold = -1  # binary masks stored 0/255 or as JPEG: value > threshold -> id 1; -1 = off
    # masks storing other values than the ids: class k stored as gray level or (r, g, b) colour
    # mask_values[k] (e.g. (0, 128, 255), or CamVid's colours); one more entry: the ignore label's
    c.data.folder.mask_values = ()
    c.data.folder.mask_suffix = ""  # masks/NAME<suffix>.* is the mask of images/NAME.* (e.g. '_mask', '_segmentation')
    c.data.nifti = ml_collections.ConfigDict()  # data.name='nifti': data.dir holds NIfTI volumes (segjax/data/nifti.py)
    c.data.nifti.normalize = "percentile"  # per volume: 'percentile' (clip, scale to 0..1) | 'zscore' | 'minmax'
    c.data.nifti.percentiles = (0.5, 99.5)  # 'percentile': clip range, in percent
    c.data.tfds = ml_collections.ConfigDict()  # data.name='tfds': a TFDS catalogue dataset (configs/pets.py)
    c.data.tfds.name = ""  # e.g. 'oxford_iiit_pet:4.*.*'
    c.data.tfds.image_key = "image"  # feature holding the image
    c.data.tfds.label_key = "segmentation_mask"  # feature holding the per-pixel labels
    c.data.tfds.train_split = "train"  # stored split names used for training / validation
    c.data.tfds.val_split = "test"
    c.data.tfds.test_split = ""  # stored split held out for `--eval_only=... --eval_split=test`; '' = none
    c.data.label_map = config_dict.placeholder(tuple)  # stored label value v -> class id label_map[v]; None = as stored
    c.data.resize = 0  # resize every image to resize x resize on load (labels: nearest); 0 = native size
    # 2D: move every image (both splits, before augmentation; labels untouched) by this many
    # pixels (rows, cols), cubic spline, so images line up with labels drawn off-centre;
    # `python -m segjax.data.alignment --config=...` measures it on the training split
    c.data.image_shift = (0.0, 0.0)
    # size of one pixel (voxel) per spatial axis, in `spacing_unit`, for data that stores none
    # (image folders, TFDS, synthetic): HD95 / surface Dice in physical units with
    # eval.surface_units='physical'; None = unknown. NIfTI volumes carry their own (mm).
    c.data.spacing = config_dict.placeholder(tuple)
    c.data.spacing_unit = "mm"
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.seed = 0  # generator seed (the dataset's content, not the training order)
    c.data.synthetic.image_size = 64  # square scene size in pixels
    c.data.synthetic.num_train = 2000  # scenes in the train split
    c.data.synthetic.num_val = 200  # scenes in the validation split
    c.data.synthetic.num_test = 0  # scenes in a held-out test split (scored by --eval_split=test); 0 = none
    c.data.synthetic.noise = 0.05  # std of Gaussian pixel noise (0..1 intensity scale)
    c.data.synthetic.contrast = 1.0  # object/background contrast, 0..1
    c.data.synthetic.min_objects = 2  # objects (tools, berry clusters, leaves) per scene
    c.data.synthetic.max_objects = 5
    c.data.synthetic3d = ml_collections.ConfigDict()  # data.name='synthetic_volumes' (3D)
    c.data.synthetic3d.seed = 0
    c.data.synthetic3d.size = 32  # cube edge in voxels
    c.data.synthetic3d.num_train = 200
    c.data.synthetic3d.num_val = 40
    c.data.synthetic3d.num_test = 0
    c.data.synthetic3d.noise = 0.08
    c.data.synthetic3d.min_objects = 2
    c.data.synthetic3d.max_objects = 5
    c.data.augment = ml_collections.ConfigDict()
    c.data.augment.crop = 0  # random crop edge (2D: crop^2, 3D: crop^3); 0 = whole image
    c.data.augment.rotate = 0.0  # max rotation in degrees (2D); 0 = off
    c.data.augment.scale_min = 1.0  # random zoom range (2D); 1, 1 = off
    c.data.augment.scale_max = 1.0
    c.data.augment.elastic_alpha = 0.0  # elastic deformation strength in pixels (2D); 0 = off
    c.data.augment.elastic_sigma = 10.0  # smoothness of the elastic displacement field, pixels
    c.data.augment.image_order = 1  # image interpolation of those warps: 1 linear | 3 cubic (sharper, slower)
    c.data.augment.flip = True  # random mirror along W (left-right)
    c.data.augment.vflip = True  # also random mirrors along H (and D for volumes); off for upright content
    c.data.augment.rot90 = True  # random multiples of 90 degrees in the (H, W) plane (square only)
    # image only: Gaussian blur of a random sigma in blur_sigma (pixels, each spatial axis) with
    # probability blur_prob (nnU-Net: 0.2, (0.5, 1.0)); 0 = off
    c.data.augment.blur_prob = 0.0
    c.data.augment.blur_sigma = (0.5, 1.0)
    c.data.augment.brightness = 0.0  # image only: +- uniform shift (0..1 scale); 0 = off
    c.data.augment.contrast = 0.0  # image only: x uniform(1 - c, 1 + c) around the mean; 0 = off
    c.data.augment.gamma = 0.0  # image only: ** exp(uniform(-g, g)); 0 = off
    c.data.augment.noise = 0.0  # image only: Gaussian noise std; 0 = off

    c.model = ml_collections.ConfigDict()
    c.model.arch = "unet"  # 'unet' | 'encoder_decoder' | 'unetpp' | 'vnet' (segjax/models/__init__.py: ARCHS)
    c.model.spatial_dims = 2  # 2 = images [N,H,W,C], 3 = volumes [N,D,H,W,C]
    c.model.depth = 3  # number of 2x down-sampling steps; input sizes must divide by 2**depth
    c.model.base_features = 16  # channels at full resolution, doubled per level
    c.model.features = config_dict.placeholder(tuple)  # explicit channels per level (overrides base)
    c.model.bottleneck_features = config_dict.placeholder(int)  # default: 2x the deepest level
    c.model.skips = "all"  # 'all' | 'none' | 0/1 per level, full resolution first (e.g. '110')
    c.model.upsample = "transpose"  # 'transpose' (2x2 stride-2 conv) | 'resize' (bilinear + 3x3 conv)
    c.model.pool = "max"  # 'max' | 'avg'
    c.model.norm = "batch"  # 'batch' | 'group' | 'none'
    c.model.num_convs = 2  # convolutions per block (unet, unetpp)
    c.model.kernel_size = 3  # convolution kernel edge (vnet uses 5)
    c.model.deep_supervision = False  # a head per decoder level (unet) / on each X^{0,j} (unetpp)
    c.model.inference_head = 0  # unetpp at eval: 0 = mean of the heads, j = pruned network ending at head j
    c.model.stage_convs = config_dict.placeholder(tuple)  # vnet: convs per level 0..depth (default 1,2,3,3,..)
    c.model.dropout = 0.0  # dropout rate after the bottleneck block
    c.model.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16' (params stay float32)
    c.model.freeze_encoder = False  # keep the (pretrained) encoder fixed; train the decoder (and head)

    c.pretrain = ml_collections.ConfigDict()  # the classic recipe (segjax/pretrain.py), every architecture
    c.pretrain.steps = 0  # > 0: first train the encoder as a classifier of the classes present in each image
    c.pretrain.lr = 3e-3  # its peak learning rate (warm-up, schedule and the rest as in optim)

    c.instances = ml_collections.ConfigDict()  # instance / panoptic segmentation (segjax/instances.py), 2D
    c.instances.enabled = False  # add an 'instance_boundary' class; report PQ/SQ/RQ from the dataset's instance maps
    c.instances.thing_classes = ()  # classes made of instances; () = every class but 0 (the others are stuff)
    c.instances.boundary_width = 1  # pixels of an instance's border that form the boundary class
    c.instances.min_size = 4  # predicted instances smaller than this (pixels) are dropped

    c.loss = ml_collections.ConfigDict()
    c.loss.terms = "ce+dice"  # '+'-joined terms from segjax/losses.py: LOSSES
    c.loss.ce_weight = 1.0  # weight of 'ce' and 'focal'
    c.loss.dice_weight = 1.0  # weight of 'dice' and 'tversky'
    c.loss.dice_smooth = 1.0  # additive smoothing of the soft Dice/Tversky index
    c.loss.lovasz_weight = 1.0  # weight of 'lovasz' (Lovász-softmax, a convex surrogate of 1 - IoU)
    c.loss.dice_background = True  # class 0 counts in the Dice/Tversky/Lovász mean
    c.loss.dice_empty = "one"  # class absent from a batch's targets: 'one' (smoothed index) | 'nan' (left out)
    c.loss.tversky_alpha = 0.3  # Tversky weight of false positives
    c.loss.tversky_beta = 0.7  # Tversky weight of false negatives (beta > alpha favours recall)
    c.loss.label_smoothing = 0.0  # cross-entropy label smoothing
    c.loss.class_weights = config_dict.placeholder(tuple)  # cross-entropy weight per class
    c.loss.focal_gamma = 2.0  # focal-loss focusing exponent (0 = cross-entropy)
    # one weight per deep-supervision head; default: unet 1, 1/2, 1/4, ... (normalised), unetpp equal
    c.loss.deep_supervision_weights = config_dict.placeholder(tuple)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # 'adamw' | 'sgd'
    c.optim.lr = 3e-3  # peak learning rate
    c.optim.schedule = "cosine"  # 'cosine' | 'poly' (nnU-Net's) | 'constant', each after a linear warm-up
    c.optim.poly_power = 0.9  # 'poly': lr * (1 - t / T) ** poly_power
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 1e-4
    c.optim.momentum = 0.9  # SGD momentum / Adam b1
    c.optim.nesterov = False  # SGD: Nesterov momentum (nnU-Net: SGD, momentum 0.99, Nesterov, poly)
    c.optim.grad_clip = 1.0  # global-norm gradient clipping; 0 = off
    c.optim.ema_decay = 0.0  # > 0 (e.g. 0.999): evaluate a moving average of the weights (not in pretraining)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 800  # optimizer steps
    c.train.batch_size = 16  # global batch (all devices and hosts together)
    c.train.grad_accum_steps = 1  # split each batch into this many sequential micro-batches (memory)
    c.train.seed = 0  # init, dropout and data-order seed
    c.train.num_seeds = 1  # K > 1: train seeds seed..seed+K-1 as K replicas in one vmapped step
    c.train.log_every = 50  # steps between logged training metrics
    c.train.checkpoint_every = 400  # steps between checkpoints (and at the end)
    c.train.keep_checkpoints = 2  # latest checkpoints kept; the best (train.best_metric) is kept apart
    c.train.best_metric = "val/miou"  # the validation score that picks best/, e.g. 'val/dice/<class>', 'val/loss'
    c.train.best_mode = "max"  # 'max' | 'min' (for losses): which end of train.best_metric is best
    c.train.nonfinite = "stop"  # NaN/Inf loss or gradient: 'stop' (error naming the step) | 'skip' the batch

    c.parallel = ml_collections.ConfigDict()
    c.parallel.mode = "jit"  # 'jit' (global-view jit over a device mesh) | 'pmap' (pmean gradients, cross-replica BN)

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 400  # steps between validation passes (and at the end)
    c.eval.batch_size = 50  # the last batch is padded and masked, so every pixel counts once
    c.eval.average = "dataset"  # 'dataset' (counts summed over the split) | 'per_image' | 'micro'
    c.eval.boundary_dilation = 1  # Boundary IoU band width in pixels (val/mbiou); 0 = off
    c.eval.empty = "nan"  # class absent from truth and prediction: 'nan' (left out of means) | 'one' | 'zero'
    c.eval.include_background = True  # class 0 counts in the means
    c.eval.window = 0  # sliding-window inference: window edge in pixels (multiple of 2**depth); 0 = whole image
    c.eval.window_overlap = 0.5  # fraction of a window shared with its neighbour
    c.eval.window_blend = "gaussian"  # 'gaussian' (nnU-Net importance map) | 'constant' (plain average)
    c.eval.tta = "none"  # test-time augmentation: 'none' | 'hflip' (left-right) | 'flip' (every axis) | 'd4' (2D)
    c.eval.surface_metrics = False  # also HD95 and normalised surface Dice per image (host; segjax/surface.py)
    c.eval.nsd_tolerance = 1.0  # surface Dice tolerance, in eval.surface_units
    c.eval.surface_units = "pixels"  # HD95 / NSD: 'pixels' (voxels) | 'physical' (NIfTI: mm; else data.spacing)
    c.eval.interval_resamples = 2000  # 95 % bootstrap intervals over the images under the final results; 0 = none

    c.baseline = ml_collections.ConfigDict()  # classic methods (segjax/baselines.py), scored like the networks
    c.baseline.enabled = False  # a study variant that is this classic method: scored (seconds), not trained
    c.baseline.method = "otsu"  # 'otsu' | 'adaptive' | 'edges' | 'watershed' | 'multiotsu' (every class)
    c.baseline.invert = False  # class 1 where the method finds *dark* regions (e.g. ISBI membranes: True)
    c.baseline.auto_polarity = False  # per image: objects are the minority side of Otsu's threshold
    c.baseline.smooth_sigma = 1.0  # Gaussian smoothing before thresholding, pixels; 0 = off
    c.baseline.block_size = 51  # adaptive: local threshold window, pixels (odd)
    c.baseline.offset = 0.0  # adaptive: subtracted from the local mean (0..1 intensity scale)
    c.baseline.edge_sigma = 2.0  # edges: Canny smoothing, pixels
    c.baseline.edge_width = 1  # edges: dilation of the edge map, pixels; 0 = fill closed contours instead
    c.baseline.min_distance = 5  # watershed: minimum distance between markers, pixels
    c.baseline.levels = 0  # multiotsu: intensity levels per image (2..4); 0 = data.num_classes
    c.baseline.level_classes = ()  # multiotsu: class of each level, darkest first; () = fitted on the train split
    return c
