"""The methods a heterogeneous federation compares, as the flags each sets.

docs/design.md, section 1.4: FedDP and the sub-model methods (channel
policies of one gated model), the two dense baselines, and the remedies
tried on FedDP's accuracy at narrow tiers. `experiments.grid --methods`
runs them; `method_of` names a finished run by them.
"""

from typing import Optional

METHODS = {
    'feddp': dict(dynamic_pruning=True, channel_policy='feddp',
                  static_batch_norm=True),
    'feddp_trained_bn': dict(dynamic_pruning=True, channel_policy='feddp'),
    'heterofl': dict(dynamic_pruning=True, channel_policy='heterofl'),
    'fjord': dict(dynamic_pruning=True, channel_policy='fjord'),
    'dense': dict(dynamic_pruning=False, channel_policy='feddp'),
    'dense_full_tier': dict(dynamic_pruning=False, channel_policy='feddp',
                            tier_min_keep_ratio=1.0),
}
# FedDP's remedies: the authors' gate input (the identity of the channel
# means, their ResNet's), a load-balancing loss, a schedule that starts
# dense, self-distillation from the full width.
REMEDIES = {
    'feddp_identity': dict(gate_input='identity'),
    'feddp_balance': dict(gate_balance=0.1),
    'feddp_warmup': dict(keep_ratio_warmup_rounds=10),
    'feddp_distill': dict(self_distillation=1.0),
}
METHODS.update({name: dict(METHODS['feddp'], **flags)
                for name, flags in REMEDIES.items()})
DEFAULTS = dict(static_batch_norm=False, gate_input='sigmoid', gate_balance=0.0,
                keep_ratio_warmup_rounds=0, self_distillation=0.0,
                tier_min_keep_ratio=0.0)


def method_of(config: dict) -> Optional[str]:
  """The name in `METHODS` of a run's configuration (config.json), or None.

  A method's flags, with those of `DEFAULTS` it does not set at their
  defaults, must all be the run's: a FedDP run with a balance loss is
  feddp_balance, not feddp. A prefix policy always evaluates with static
  batch norm, so that flag does not tell its runs apart.
  """
  def matches(flags):
    wanted = dict(DEFAULTS, **flags)
    if config.get('channel_policy', 'feddp') != 'feddp':
      wanted.pop('static_batch_norm')
    return all(config.get(k, DEFAULTS.get(k)) == v for k, v in wanted.items())
  for name, flags in METHODS.items():
    if matches(flags):
      return name
  return None
