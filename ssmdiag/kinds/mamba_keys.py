"""The config keys that size each Mamba-based family's SSM layers (what polarization's surgery rewrites)."""

_M1 = {"state": "mamba_d_state", "dt_rank": "mamba_dt_rank", "expand": "mamba_expand"}
_M2 = {"state": "mamba_d_state", "heads": "mamba_n_heads", "head_dim": "mamba_d_head", "groups": "mamba_n_groups",
       "expand": "mamba_expand"}
# "d_inner" when the config states it outright (expand is then not needed), "expand" None when d = heads · head_dim by construction
SSM_CONFIG_KEYS = {
    "mamba": {"state": "state_size", "dt_rank": "time_step_rank", "expand": "expand"},
    "falcon_mamba": {"state": "state_size", "dt_rank": "time_step_rank", "expand": "expand"},
    "mamba2": {"state": "state_size", "heads": "num_heads", "head_dim": "head_dim", "groups": "n_groups",
               "expand": "expand"},
    "bamba": _M2, "granitemoehybrid": _M2, "falcon_h1": {**_M2, "d_inner": "mamba_d_ssm"},
    "nemotron_h": {"state": "ssm_state_size", "heads": "mamba_num_heads", "head_dim": "mamba_head_dim",
                   "groups": "n_groups", "expand": None},
    "zamba2": {"state": "mamba_d_state", "heads": "n_mamba_heads", "head_dim": "mamba_headdim",
               "groups": "mamba_ngroups", "expand": "mamba_expand"},
    "jamba": _M1, "zamba": _M1,
}  # every family whose SSM layers ssmdiag sees
