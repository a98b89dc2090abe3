"""The recipe stages of merge: ``merge`` (``merge.linear``, ``merge.slerp``,
``merge.task_arithmetic``, ``merge.ties``, ``merge.dare``) and ``fuse`` (``fuse.batchnorm``,
``fuse.conv_bn_relu``; the ``fuse`` prefix is an alias of this folder, see
:data:`slimtorch.core.methods.PREFIX_ALIASES`). Every module here is found by
:func:`slimtorch.core.methods.load_methods`: a new one needs no import list.
"""
