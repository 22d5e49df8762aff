"""The Vagrantfile: valid Ruby, and the VMs it defines are the topology's.

Needs `ruby` and `vagrant` (Debian packages). A stub `Vagrant.configure`
records what the Vagrantfile defines, and the test compares it with
lab/topology.yaml read by the lab's own loader.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lab.topology import load_topology

ROOT = Path(__file__).resolve().parents[2]
VAGRANTFILE = ROOT / "Vagrantfile"

# Loads a Vagrantfile with a recording stand-in for Vagrant's config object
# and prints, per VM, its private networks and provisioners as JSON.
STUB = r"""
require "json"
$vms = {}
class Recorder
  def initialize(vm = nil)
    @vm = vm
  end

  def define(name, *_args)
    $vms[name.to_s] = { "networks" => [], "provisioners" => [] }
    yield Recorder.new(name.to_s) if block_given?
    self
  end

  def network(type, **opts)
    $vms[@vm]["networks"] << opts.transform_keys(&:to_s).merge("type" => type.to_s) if @vm
    self
  end

  def provision(type, **opts)
    $vms[@vm]["provisioners"] << opts.transform_keys(&:to_s).merge("type" => type.to_s) if @vm
    self
  end

  def method_missing(_name, *_args, **_opts)
    yield self if block_given?
    self
  end

  def respond_to_missing?(*_args)
    true
  end
end

module Vagrant
  def self.configure(_version)
    yield Recorder.new
  end
end

load ARGV.fetch(0)
puts JSON.generate($vms)
"""


@pytest.fixture(scope="module")
def ruby() -> str:
    path = shutil.which("ruby")
    if path is None:
        pytest.fail("ruby is not installed (apt-get install ruby); the Vagrantfile test needs it",
                    pytrace=False)
    return path


@pytest.fixture(scope="module")
def vms(ruby, tmp_path_factory) -> dict:
    stub = tmp_path_factory.mktemp("vagrant") / "stub.rb"
    stub.write_text(STUB)
    out = subprocess.run([ruby, str(stub), str(VAGRANTFILE)], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_vagrantfile_is_valid_ruby(ruby) -> None:
    out = subprocess.run([ruby, "-c", str(VAGRANTFILE)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "Syntax OK" in out.stdout, out.stderr


def test_one_vm_per_dc_and_host(vms) -> None:
    topo = load_topology()
    assert list(vms) == [n.name for n in topo.nodes]


def test_vm_networks_follow_the_topology(vms) -> None:
    """One isolated network per segment, in segment order, with the
    topology's address, no address set by Vagrant, and a MAC the
    provisioning finds the NIC by."""
    topo = load_topology()
    macs = set()
    for node in topo.nodes:
        nets = vms[node.name]["networks"]
        assert [n["virtualbox__intnet"] for n in nets] == \
            [f"privedge-{s}" for s in node.segments], node.name
        for net, link in zip(nets, node.links, strict=True):
            seg = topo.segment(link.segment)
            assert net["type"] == "private_network" and net["auto_config"] is False
            assert net["ip"] == str(link.v4)
            assert net["libvirt__network_name"] == net["virtualbox__intnet"]
            assert net["libvirt__mtu"] == seg.mtu
            assert net["virtualbox__mac"] == net["mac"].replace(":", "")
            # Native XDP needs virtio-net on both providers.
            assert net["virtualbox__nic_type"] == net["libvirt__model_type"] == "virtio"
            macs.add(net["mac"])
    assert len(macs) == sum(len(n.links) for n in topo.nodes)


def test_vms_are_provisioned_like_the_namespace_lab(vms) -> None:
    topo = load_topology()
    for node in topo.nodes:
        (prov,) = vms[node.name]["provisioners"]
        script = prov["inline"]
        assert "scripts/setup.sh" in script
        assert f"-m lab provision {node.name} " in script
        for net, seg in zip(vms[node.name]["networks"], node.segments, strict=True):
            assert f"--if {seg}=mac:{net['mac']}" in script
        assert ("-m agent.daemon run" in script) == node.is_dc, node.name
        assert (f"-m lab generate {node.name} " in script) == node.is_dc
        # The origin host runs the lab's origin over TLS, the others do not.
        assert ("-m lab.origin --port 443" in script) == (node.name == topo.origin.host)


def test_vagrant_validates_it(tmp_path) -> None:
    """Vagrant itself (Debian's vagrant package) accepts the file; no
    provider is installed here, so provider settings are not checked."""
    vagrant = shutil.which("vagrant")
    if vagrant is None:
        pytest.fail("vagrant is not installed (apt-get install vagrant)", pytrace=False)
    out = subprocess.run([vagrant, "validate", "--ignore-provider"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT,
                         env={"HOME": str(tmp_path), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                              "VAGRANT_HOME": str(tmp_path / ".vagrant.d"),
                              "VAGRANT_CHECKPOINT_DISABLE": "1"})
    assert out.returncode == 0 and "validated successfully" in out.stdout, \
        out.stdout + out.stderr
