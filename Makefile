# The two set-up commands (README): `make demo` and `make test`.
# Both install what is missing (Debian packages, scripts/deps.sh), configure
# and build with CMake + Ninja in build/ (Release, warnings as errors).
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
DEMO_ARGS ?=

.PHONY: all deps build test demo install bench bench-deps format clean

all: build

deps:
	@scripts/deps.sh

$(BUILD)/build.ninja:
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DWEFT_WERROR=ON $(CMAKE_FLAGS)

build: deps $(BUILD)/build.ninja
	cmake --build $(BUILD) -j $(JOBS)

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS) --timeout 900

demo: build
	scripts/demo.sh $(DEMO_ARGS)

install: build
	cmake --install $(BUILD) --prefix $(or $(PREFIX),/usr/local)

bench-deps:
	@scripts/deps.sh bench

bench: bench-deps build
	scripts/bench_report.sh

format:
	find include src tests tools bench examples -name '*.h' -o -name '*.cc' | xargs clang-format -i

clean:
	rm -rf $(BUILD)
