"""The MRC reward service: a thin HTTP shell around :class:`carve3d_reward.model.MRCModel`."""
