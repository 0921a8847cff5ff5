// Work handles: a point-to-point request, or a collective running on the
// world's collective thread.
#pragma once

#include <exception>
#include <memory>
#include <string>

#include "comm/group.h"
#include "core/mutex.h"
#include "weft/work.h"

namespace weft::comm {

class P2PWork : public Work {
 public:
  P2PWork(std::shared_ptr<Group> group, transport::RequestPtr req, Deadline deadline)
      : group_(std::move(group)), req_(std::move(req)), deadline_(deadline) {}
  void wait(Timeout timeout) override;
  bool test() override;
  std::exception_ptr error() const override { return req_->error(); }
  void abort() override;
  std::string describe() const override { return req_->describe(); }

 private:
  std::shared_ptr<Group> group_;
  transport::RequestPtr req_;
  Deadline deadline_;
};

// Completed by the task that runs the collective (finish()).
class CollectiveWork : public Work {
 public:
  CollectiveWork(std::shared_ptr<Group> group, std::string description, Deadline deadline)
      : group_(std::move(group)), description_(std::move(description)), deadline_(deadline) {}
  void finish(std::exception_ptr error) EXCLUDES(mu_);
  const Deadline& deadline() const { return deadline_; }

  void wait(Timeout timeout) EXCLUDES(mu_) override;
  bool test() EXCLUDES(mu_) override;
  std::exception_ptr error() const EXCLUDES(mu_) override;
  void abort() override;
  std::string describe() const override { return description_; }

 private:
  std::shared_ptr<Group> group_;
  std::string description_;
  Deadline deadline_;
  mutable Mutex mu_;
  CondVar cv_{&mu_};  // done_ became true
  bool done_ GUARDED_BY(mu_) = false;
  std::exception_ptr error_ GUARDED_BY(mu_);
};

// Aborts the world of `group` on behalf of the application.
void abort_world(Group& group, const std::string& reason);

}  // namespace weft::comm
