"""vfe-vhostd's error codes and their texts: the reference's errno table.

Every method's result ends with ``errno`` (0, -errno for a system error, or
-10xx for the service's own) and ``errstr``, as the reference service's do
(Mellanox dpdk-vhost-vfe, app/vfe-vdpa/vdpa_rpc.c).  ``errstr`` is
``strerror`` for 1..159, else the reference's table below.
"""
from __future__ import annotations

import os

# -- the reference's error table (drivers/common/virtio/virtio_util.[ch]) -------

ERR_BASE = 1000
ERR_NO_PF_NAME = 1000
ERR_NO_PF_DEVICE = 1001
ERR_NO_VF_NAME = 1002
ERR_NO_VF_DEVICE = 1003
ERR_VFIO_DEV_FD = 1004
ERR_EXCEED_LIMIT = 1005
ERR_RESET_DEVICE_TIMEOUT = 1006
ERR_DEVARGS_PARSE = 1007
ERR_ADD_PF_ALREADY_ADD = 1008
ERR_DEVICE_PROBE_FAIL = 1009
ERR_ADD_PF_DEVICEID_NOT_SUPPORT = 1010
ERR_REMOVE_PF_WITH_VF = 1013
ERR_ADD_VF_ALREADY_ADD = 1014
ERR_ADD_VF_EXCEED_VPORT_LIMIT = 1029
ERR_ADD_VF_NO_ACCESS_SOCKET_PATH = 1030
ERR_ADD_VF_VHOST_SOCK_EXIST = 1038
ERR_REMOVE_VF_RESTORE_IN_PROGRESS = 1042

ERR_STRINGS = (
    "Please provide PF name",                                   # 1000
    "PF device not found",
    "Please provide VF name",
    "VF device not found",
    "VFIO device fd invalid",
    "Number exceed limit",                                      # 1005
    "Device reset timeout",
    "Devargs parse fail",
    "PF device already add",
    "Device probe fail",
    "PF deviceid not support",                                  # 1010
    "PF device feature does not meet requirements",
    "Can't allocate admin queue",
    "Please remove all VF devices before remove PF",
    "VF device already add",
    "No vfid found",                                            # 1015
    "Can't create VFIO container",
    "Can't bind to VFIO container group",
    "Can't get IOMMU group",
    "Can't allocate device",
    "Can't register device",                                    # 1020
    "Can't allocate queue",
    "No vector",
    "Can't allocate interrupt",
    "Can't register interrupt",
    "Can't enable interrupt",                                   # 1025
    "BAR copy wrong",
    "set status quiesced fail",
    "set status freezed fail",
    "Exceed vport limit",
    "Can't access vhost socket path",                           # 1030
    "Fail in calling rte_vhost_driver_register",
    "Fail in calling rte_vdpa_get_features",
    "Fail in calling rte_vhost_driver_set_features",
    "Fail in calling rte_vhost_driver_callback_register",
    "Fail in calling rte_vhost_driver_attach_vdpa_device",      # 1035
    "Fail in calling rte_vhost_driver_start",
    "Can't allocate iommu domain",
    "Vhost socket file already exists",
    "Exceed max VFIO group number",
    "Fail to save state",                                       # 1040
    "Fail to store fds to HA",
    "VF device is restoring",
)
#: below this a code is a system errno, named by strerror
STD_ERR_MAX = 160


def errstr(code: int) -> str:
    """The reference's rte_vdpa_err_str_get(): strerror for system errnos."""
    err = abs(int(code))
    if 0 < err < STD_ERR_MAX:
        return os.strerror(err)
    if err == 0:
        return "Success"
    if 0 <= err - ERR_BASE < len(ERR_STRINGS):
        return ERR_STRINGS[err - ERR_BASE]
    return "Unknown error"


class VdpaError(Exception):
    """A method's failure: becomes ``{"errno": code, "errstr": ...}``."""

    def __init__(self, code: int, detail: str = ""):
        super().__init__(detail or errstr(code))
        self.code = -abs(int(code))
        self.detail = detail or errstr(code)


def with_errno(result: dict, code: int) -> dict:
    """``result`` ended with ``errno`` and ``errstr``, as every method's is."""
    result["errno"] = code
    result["errstr"] = errstr(code)
    return result
