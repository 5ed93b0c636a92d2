"""Around the metric, not part of it: what validates it, shows it and runs it on files.

* :mod:`.synthetic`: procedural objects rendered at any cameras, and views
  made inconsistent on purpose (the paper's Sec. 3.3 experiment, tests, the
  trainer's pre-training data);
* :mod:`.validate`: ``mrc validate``, MRC against controlled inconsistency;
* :mod:`.files`: ``mrc score``'s library: score image files, print the table;
* :mod:`.sheets`: a picture per grid (input, re-render, crops, difference);
* :mod:`.camera_figure`: the camera convention's picture (``docs/cameras.md``);
* :mod:`.demo`: ``mrc demo``, the quick start.
"""
