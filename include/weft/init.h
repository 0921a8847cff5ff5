// weft::init(): the world communicator from the launcher's environment.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "weft/communicator.h"
#include "weft/options.h"

namespace weft {

// Where this process stands in its job, as told by the launcher.
struct LaunchEnvironment {
  // "weft", "mpirun", "slurm", "torchrun".
  std::string launcher;
  int rank = 0;
  int size = 1;
  int local_rank = 0;
  int local_size = 1;
  // The rendezvous store, host and port.
  std::string store_host;
  uint16_t store_port = 0;
  // True when this process (rank 0) must serve the store itself: under
  // mpirun, srun and torchrun when WEFT_STORE is not set.
  bool serve_store = false;
};

// Reads the environment:
//  * `weft run`: WEFT_RANK, WEFT_WORLD_SIZE, WEFT_LOCAL_RANK, WEFT_LOCAL_SIZE,
//    WEFT_STORE (host:port), WEFT_JOB_TOKEN.
//  * mpirun (Open MPI): OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE,
//    OMPI_COMM_WORLD_LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_SIZE.
//  * Slurm (srun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and
//    SLURM_NTASKS_PER_NODE (or SLURM_TASKS_PER_NODE).
//  * torchrun: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
//    MASTER_PORT.
// The store is WEFT_STORE when set. Otherwise rank 0 serves it at
// MASTER_ADDR:WEFT_STORE_PORT (default MASTER_PORT + 1 under torchrun, whose
// own agent holds MASTER_PORT; MASTER_PORT otherwise).
// Throws weft::InvalidArgument naming the variable that is missing or bad.
LaunchEnvironment detect_launch_environment();

// Builds the world communicator described by detect_launch_environment(),
// serving the store from rank 0 when the launcher does not. The returned
// communicator keeps that store server alive.
std::shared_ptr<Communicator> init(CommOptions options = CommOptions::from_env());

}  // namespace weft
