import platform

from cloud_agent.malloc import reuse_large_buffers


def test_glibc_takes_the_cloud_allocator_setting():
    assert reuse_large_buffers() is (platform.libc_ver()[0] == "glibc")
