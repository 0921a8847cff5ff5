// DataParallel's compression state (see weft/train.h, weft/compress.h):
// the codec of each bucket, the codec thread that runs them in bucket
// order, the automatic choice, and the codecs and anchor of compressed
// parameter averaging. Shared by data_parallel.cc and
// engine_compression.cc.
#pragma once

#include <deque>
#include <exception>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/mutex.h"
#include "core/thread_annotations.h"
#include "weft/compress.h"
#include "weft/train.h"

namespace weft::train {

struct DataParallel::Compression {
  // One bucket to reduce: its memory and the communicator of the step.
  struct Task {
    size_t bucket = 0;
    void* data = nullptr;
    size_t numel = 0;
    DType dtype = DType::Float32;
    Communicator* comm = nullptr;
    Timeout timeout{};
  };

  explicit Compression(CompressionOptions gradient, CompressionOptions parameter);
  // Stops and joins the codec thread (the engine drains it first).
  ~Compression();
  Compression(const Compression&) = delete;
  Compression& operator=(const Compression&) = delete;

  // Queues a bucket; the codec thread reduces queued buckets one at a time,
  // in the order they were queued.
  void submit(const Task& task);
  // True while a queued bucket is not reduced yet.
  bool busy();
  // Waits for every queued bucket; returns the seconds it waited and the
  // wire bytes they sent. Rethrows the first error (and forgets it).
  double wait(uint64_t* bytes);
  // As wait(), swallowing the error (unwinding, rebinding).
  void wait_quietly() noexcept;

  const CompressionOptions options;            // of the gradients
  const CompressionOptions parameter_options;  // of parameter averages
  // Per bucket: its codec (null: the bucket is allreduced as it is). Used
  // by the codec thread while a bucket is queued, by the engine's thread
  // when none is.
  std::vector<std::unique_ptr<GradientCodec>> codecs;
  std::vector<CodecLayout> layouts;  // per bucket (float32 buckets only are compressed)
  CompressionOptions current;        // the codec in use (the automatic choice)
  std::vector<CodecTiming> timings;  // the last automatic measurement
  int64_t switches = 0;              // changes of the automatic choice after the first

  // Parameter averaging: per group of the engine's parameter Flat, its
  // codec (null: averaged as it is), and the values of the last average.
  std::vector<std::unique_ptr<GradientCodec>> param_codecs;
  std::shared_ptr<void> anchor;
  // Whether the anchor holds the parameters every rank had at the last
  // average. Not after construction or rebind (the caller may restore a
  // checkpoint or commit next), set_step(), a step whose gradients were
  // averaged, or an explicit broadcast: the next average is then sent
  // uncompressed (it makes the replicas equal) and becomes the anchor.
  bool anchor_valid = false;

 private:
  void run();

  Mutex mu_;
  CondVar changed_{&mu_};
  std::deque<Task> queue_ GUARDED_BY(mu_);
  size_t submitted_ GUARDED_BY(mu_) = 0;
  size_t completed_ GUARDED_BY(mu_) = 0;
  uint64_t bytes_ GUARDED_BY(mu_) = 0;
  std::exception_ptr error_ GUARDED_BY(mu_);
  bool stop_ GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace weft::train
