"""The paper's 1D toy experiment (AccVideo Fig. 2, supplement A): ``python -m accvideo_core.toy --out DIR``.

``experiment`` (config, network, training, distillation data sets, the "useless start point" count),
``report`` (table and figure), ``plot`` (axes mapping data onto the shared canvas ``utils/canvas.py``); docs/toy1d.md.
"""
