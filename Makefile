# The two set-up commands (README): `make demo` and `make test`.
# Both install what is missing (Debian packages, scripts/deps.sh), configure
# and build with CMake + Ninja in build/ (Release, warnings as errors).
# `make test` is also what CI runs (.ci/run): the whole suite on the Release
# build (`make test-release`), then the checks of `make ci-checks`.
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
DEMO_ARGS ?=
# ccache when installed (faster rebuilds of the extra builds below).
LAUNCHER := $(if $(shell command -v ccache),-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
# The extra builds leave out what their checks do not need.
SMALL_BUILD := -DWEFT_BUILD_BENCH=OFF -DWEFT_BUILD_EXAMPLES=OFF $(LAUNCHER)
# What the sanitizer builds run: the transport, collective and fault tests (ctest labels, see
# tests/CMakeLists.txt), and under ASan the reduction kernels too (single-threaded: not for TSan).
SAN_TARGETS := engine_test matching_test shm_transport_test shm_p2p_test shm_process_test shm_worker \
  collectives_test coll_worker comm_fault_test comm_worker weft_cli elastic_test
# Also the engine's, the balancer's, the shard queue's and the checkpoints' tests (threads with
# in-process worlds, the queue's state parser and the checkpoint image fed every truncation and
# flipped byte, the checkpoint writer's thread), selected by suite name.
SAN_UNIT_TARGETS := train_test planner_test balancer_test shard_queue_test checkpoint_test compress_test codec_dense_test codec_sparse_test
SAN_UNIT_TESTS := '^(DataParallel|Replan|ProportionalShares|SanitizeRates|GradientWeight|Balancer|ShardQueue|ShardQueueState|TrainState|CheckpointWriter|LoadLatest|CompressionOptions|CompressedDataParallel|DeltaBroadcast|CodecDense|TopK|PowerSgd|Convergence)\.'
# The collective matrices run whole in the Release suite; under the sanitizers only the in-process
# worlds of 1 and 2 ranks (the others take 4 to 6 minutes each there under ASan on 2 cores, and the
# whole set far longer under TSan).
SAN_CTEST := ctest --output-on-failure -j $(JOBS) --timeout 900 \
  -E 'CaseMatrix|World/ProcessRanks|EveryCollectiveMatchesTheReference/[3-9]'

.PHONY: all deps build test test-release demo install bench bench-deps format clean \
        ci-checks format-check ci-thread-safety ci-asan ci-tsan

all: build

deps:
	@scripts/deps.sh

$(BUILD)/build.ninja:
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DWEFT_WERROR=ON $(CMAKE_FLAGS)

build: deps $(BUILD)/build.ninja
	cmake --build $(BUILD) -j $(JOBS)

test: test-release ci-checks

test-release: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS) --timeout 900

# The checks CI adds to the test suite (each can be run on its own):
# - format-check: every C++ file as .clang-format says (`make format` fixes);
# - ci-thread-safety: clang with -Wthread-safety -Werror (core/thread_annotations.h), in build-clang/;
# - ci-asan: AddressSanitizer + UBSan build of the transport, collective, fault and kernel tests and
#   the engine, balancer, shard-queue, checkpoint and compression suites, in build-asan/;
# - ci-tsan: ThreadSanitizer build of the same, in build-tsan/ (suppressions: scripts/tsan.supp).
ci-checks: format-check ci-thread-safety ci-asan ci-tsan

format-check:
	scripts/check_format.sh

ci-thread-safety: deps
	CXX=clang++ CC=clang cmake -S . -B build-clang -G Ninja -DCMAKE_BUILD_TYPE=Debug \
	  -DWEFT_BUILD_TESTS=OFF -DWEFT_WERROR=ON -DCMAKE_CXX_FLAGS=-DWEFT_RK_GENERIC_ONLY \
	  -DWEFT_TORCH_STATE=OFF $(SMALL_BUILD)
	cmake --build build-clang -j $(JOBS)

ci-asan: deps
	cmake --preset asan $(SMALL_BUILD)
	cmake --build build-asan -j $(JOBS) --target $(SAN_TARGETS) $(SAN_UNIT_TARGETS) reduce_kernels_test
	cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 $(SAN_CTEST) -L '^(transport|collectives|fault|kernels)$$'
	cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 $(SAN_CTEST) -R $(SAN_UNIT_TESTS)

ci-tsan: deps
	cmake --preset tsan $(SMALL_BUILD)
	cmake --build build-tsan -j $(JOBS) --target $(SAN_TARGETS) $(SAN_UNIT_TARGETS)
	cd build-tsan && TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$(CURDIR)/scripts/tsan.supp" \
	  $(SAN_CTEST) -L '^(transport|collectives|fault)$$'
	cd build-tsan && TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$(CURDIR)/scripts/tsan.supp" \
	  $(SAN_CTEST) -R $(SAN_UNIT_TESTS)

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
	rm -rf $(BUILD) build-clang build-asan build-tsan
