/* A stand-in for the NVIDIA driver's libcuda.so.1 on test machines without a GPU
 * (integration/gpu-standin builds it and registers it in the host's loader cache).
 *
 * It answers the few driver calls integration/gpu/cuda-query.c makes, counting as devices
 * the /dev/nvidiaN nodes this process can see, so a test can tell from inside a container
 * both that the loader found the host's driver library and which GPUs the container shows. */
#include <ctype.h>
#include <dirent.h>
#include <string.h>

#define CUDA_SUCCESS 0
#define CUDA_ERROR_NO_DEVICE 100

int cuInit(unsigned int flags)
{
    (void)flags;
    return CUDA_SUCCESS;
}

int cuDriverGetVersion(int *version)
{
    *version = 12040;
    return CUDA_SUCCESS;
}

int cuDeviceGetCount(int *count)
{
    DIR *dev = opendir("/dev");
    struct dirent *e;
    *count = 0;
    if (!dev)
        return CUDA_ERROR_NO_DEVICE;
    while ((e = readdir(dev)) != NULL) {
        const char *digits = e->d_name + 6;
        if (strncmp(e->d_name, "nvidia", 6) != 0 || *digits == '\0')
            continue;
        while (isdigit((unsigned char)*digits))
            digits++;
        if (*digits == '\0')
            (*count)++;
    }
    closedir(dev);
    return CUDA_SUCCESS;
}

/* Tells the stand-in from a real driver. */
const char *ferry_standin_driver(void)
{
    return "ferry stand-in libcuda";
}
