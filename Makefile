# ferry: build, install and package the launcher (`ferry`) and the Slurm plugin
# (`spank_ferry.so`). docs/admin-guide.md, "Installing", explains the targets.
#
#   make                      build both (release), and the static ferry-forward
#   make forwarder            only ferry-forward, the static program that batch scripts'
#                             containers run as srun, squeue… (docs/admin-guide.md)
#   make install              ferry to $(PREFIX)/bin, ferry-forward to $(LIBEXECDIR), the
#                             plugin into the running Slurm's
#                             PluginDir, the plugstack.conf line to $(SLURM_SYSCONFDIR)
#   make uninstall            remove what install put there
#   make deb                  a Debian package in $(DEB_DIR)
#   make rpm                  an RPM for RHEL-family nodes in $(RPM_DIR) (rpmbuild)
#
# Variables: PREFIX (/usr/local), DESTDIR (staging root), PLUGIN_DIR (the running Slurm's
# PluginDir, else Debian's), SLURM_SYSCONFDIR (/etc/slurm), FERRY_SLURM_VERSION_H (the
# slurm_version.h the plugin is built against), CARGO. FERRY and PLUGIN_SO name already
# built files (default: this tree's release build), e.g. `make install CARGO=true FERRY=...`
# installs binaries built elsewhere without building. For `make rpm`: RPM_PLUGIN_DIR (Slurm's
# plugin directory on the target nodes, /usr/lib64/slurm) and RPM_SLURM_PACKAGE (the package
# name of their Slurm, slurm).

PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
SLURM_SYSCONFDIR ?= /etc/slurm
CARGO ?= cargo
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
FERRY ?= $(TARGET_DIR)/release/ferry
PLUGIN_SO ?= $(TARGET_DIR)/release/libspank_ferry.so
# ferry-forward runs inside containers, whose C library is not the host's: a static build
# for the host's target triple (its own directory under target/, so the workspace's
# ordinary build of the same crate does not replace it). The plugin finds it at
# ../libexec/ferry/ferry-forward beside ferry_bin.
FORWARD_TARGET ?= $(shell rustc -vV 2>/dev/null | sed -n 's/^host: //p')
FORWARDER ?= $(TARGET_DIR)/$(FORWARD_TARGET)/release/ferry-forward
LIBEXECDIR ?= $(PREFIX)/libexec/ferry
FERRY_SLURM_VERSION_H ?= /usr/include/slurm/slurm_version.h
export FERRY_SLURM_VERSION_H
# Asked of Slurm only when needed (`=`, not `:=`): scontrol may be slow or absent.
PLUGIN_DIR ?= $(shell packaging/slurm-info plugin-dir)
DEB_DIR ?= $(TARGET_DIR)/debian
RPM_DIR ?= $(TARGET_DIR)/rpm
RPM_PLUGIN_DIR ?= /usr/lib64/slurm
RPM_SLURM_PACKAGE ?= slurm

CONF = $(DESTDIR)$(SLURM_SYSCONFDIR)/plugstack.conf.d/ferry.conf

.PHONY: all build forwarder print-forwarder check-slurm install uninstall deb rpm

all: build

check-slurm:
	@packaging/slurm-info check "$(FERRY_SLURM_VERSION_H)"

build: check-slurm forwarder
	$(CARGO) build --release -p ferry -p spank-ferry

forwarder:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release -p ferry-forward --target $(FORWARD_TARGET)

print-forwarder:
	@echo "$(FORWARDER)"

# The plugstack line points at the installed paths. An existing ferry.conf may carry the
# site's arguments: it is kept, and the new one is written beside it as ferry.conf.new.
install: build
	install -D -m 0755 "$(FERRY)" "$(DESTDIR)$(BINDIR)/ferry"
	install -D -m 0755 "$(FORWARDER)" "$(DESTDIR)$(LIBEXECDIR)/ferry-forward"
	install -D -m 0755 "$(PLUGIN_SO)" "$(DESTDIR)$(PLUGIN_DIR)/spank_ferry.so"
	install -d -m 0755 "$(dir $(CONF))"
	sed -e 's|^required .*|required $(PLUGIN_DIR)/spank_ferry.so ferry_bin=$(BINDIR)/ferry|' \
	    -e 's|\[/usr/local/bin/ferry\]|[$(BINDIR)/ferry]|' \
	    conf/plugstack.conf.d/ferry.conf > "$(CONF).tmp"
	@if [ -e "$(CONF)" ] && ! cmp -s "$(CONF).tmp" "$(CONF)"; then \
	    mv "$(CONF).tmp" "$(CONF).new"; \
	    echo "make install: kept the existing $(CONF); the new line is in $(CONF).new"; \
	else \
	    mv "$(CONF).tmp" "$(CONF)"; chmod 0644 "$(CONF)"; \
	fi
	@if [ -z "$(DESTDIR)" ] && ! grep -qs '^[[:space:]]*include[[:space:]].*plugstack.conf.d' "$(SLURM_SYSCONFDIR)/plugstack.conf"; then \
	    echo "make install: $(SLURM_SYSCONFDIR)/plugstack.conf does not include plugstack.conf.d/: add 'include $(SLURM_SYSCONFDIR)/plugstack.conf.d/*.conf' to it"; \
	fi
	@echo "make install: done; run 'ferry doctor' as a user on each node to check it"

uninstall:
	rm -f "$(DESTDIR)$(BINDIR)/ferry" "$(DESTDIR)$(PLUGIN_DIR)/spank_ferry.so" "$(CONF)" "$(CONF).new"
	rm -f "$(DESTDIR)$(LIBEXECDIR)/ferry-forward"
	-rmdir "$(DESTDIR)$(LIBEXECDIR)" 2>/dev/null

deb: build
	packaging/build-deb "$(FERRY)" "$(PLUGIN_SO)" "$(DEB_DIR)" "$(FORWARDER)"

rpm: build
	RPM_PLUGIN_DIR="$(RPM_PLUGIN_DIR)" RPM_SLURM_PACKAGE="$(RPM_SLURM_PACKAGE)" \
	    packaging/build-rpm "$(FERRY)" "$(PLUGIN_SO)" "$(RPM_DIR)" "$(FORWARDER)"
